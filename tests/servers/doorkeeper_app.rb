# frozen_string_literal: true

# A real OAuth 2.0 authorization server for tests: Rails + Devise + Doorkeeper
# in one file, booted without Bundler from Debian's packages (ruby-rails,
# ruby-devise, ruby-doorkeeper, ruby-sqlite3, ruby-webrick). It serves the
# gems' own HTML pages (Devise sign-in, Doorkeeper consent and out-of-band
# code page), the real /oauth/token and /oauth/revoke endpoints, and a small
# protected JSON API, so a client is tested against real server behaviour.
#
# Environment:
#   PORT                    TCP port on 127.0.0.1 (required)
#   STATE_DIR               folder for db.sqlite3, access.log, rails.log,
#                           webrick.log, secret_key_base, views/ (required)
#   ACCESS_TOKEN_TTL        access token lifetime in seconds (default 7200)
#   PREVIOUS_REFRESH_TOKEN  1|0 (default 1): whether oauth_access_tokens has
#                           the previous_refresh_token column. With it
#                           (Doorkeeper's default) the old refresh and access
#                           token stay valid after a refresh until the new
#                           access token is first used; without it they are
#                           revoked at once. Toggling it across restarts adds
#                           or drops the column.
#   CLIENT_ID, CLIENT_SECRET  uid/secret of the seeded confidential app
#                           (default test values below); redirect URI
#                           urn:ietf:wg:oauth:2.0:oob, scopes "read"
#   REDIRECT_URIS           extra redirect URIs (newline or space separated),
#                           e.g. http://127.0.0.1:8765/callback
#   DEMO_EMAIL, DEMO_PASSWORD  the seeded Devise user
#   PARENT_PID              optional: exit when this process is gone
#   RAILS_LOG_LEVEL         level of $STATE_DIR/rails.log (default "warn")
#   NO_DEVISE               1: use the built-in sign-in even if Devise loads
#   TLS_CERT, TLS_KEY       PEM certificate chain and key: WEBrick itself
#                           speaks https (no proxy in front), so every URL
#                           Rails and Doorkeeper make (redirects, the oob
#                           page, the issuer and OIDC metadata) is https
#
# Switches that make it behave like stricter servers (all off by default):
#   GRANT_SCOPES            e.g. "read": grant only those of the asked scopes
#                           (RFC 6749 §3.3); consent page, stored grant and
#                           token response `scope` show the narrowed set. If
#                           none of the asked is among them, Doorkeeper's
#                           default scope (read) is granted.
#   STRICT_REFRESH_SCOPE    1: a refresh whose `scope` names anything the
#                           refresh token was not granted gets 400
#                           invalid_scope "refresh token missing requested
#                           scope" (Doorkeeper 5.5 already answers
#                           invalid_scope; this makes it independent of the
#                           version). A refresh without `scope` keeps the
#                           granted scope either way.
#   REFUSE_ACCESS_TOKEN_REVOCATION  1: /oauth/revoke answers 400
#                           {"error":"unsupported_token_type"} (RFC 7009
#                           §2.2.1) for an access token, as a server with JWT
#                           access tokens does; refresh tokens are revoked.
#   SEND_ISS                1: RFC 9207 `iss` in every authorization response
#                           redirect (loopback redirect and the out-of-band
#                           page's URL /oauth/authorize/native?code=..&iss=..)
#   ISS_VALUE               the `iss` to send (implies SEND_ISS); default the
#                           issuer http://127.0.0.1:PORT. A wrong one mimics a
#                           mix-up attack.
#   ADVERTISE_ISS           1: with OIDC, the metadata says
#                           authorization_response_iss_parameter_supported
#                           even without SEND_ISS (a server that claims it but
#                           omits iss). SEND_ISS with OIDC advertises it too.
#   OIDC                    1: load ruby-doorkeeper-openid-connect: OpenID
#                           Connect discovery at /.well-known/openid-configuration
#                           (issuer http://127.0.0.1:PORT), id_token for the
#                           `openid` scope. Its RSA signing key is made at the
#                           first start in $STATE_DIR/oidc_signing_key.pem.
#   REQUIRE_RESOURCE        a URL: authorization requests (the first GET of
#                           /oauth/authorize) and code/refresh token requests
#                           without resource=<that URL> (RFC 8707) are refused
#                           with invalid_target (token: 400 JSON; authorize:
#                           a redirect with error=invalid_target, or a 400
#                           JSON page for the out-of-band redirect URI).
#                           Without it `resource` is accepted and ignored.
#   PUBLIC_CLIENT_ID        seed a second, public application (confidential:
#                           false, no secret to send) with that uid, the same
#                           redirect URIs and scopes: client_id in the body
#                           and PKCE; it gets refresh tokens.
#
# Devise is used when it loads. Debian 13 has no ruby-devise (nor ruby-warden,
# ruby-responders), so without it a small built-in stand-in (BuiltinAuth,
# UserSessionsController below) serves the same routes, form fields, flash
# messages and bcrypt password column as the part of Devise used here.
#
# Output: nothing on stdout but one line "READY http(s)://127.0.0.1:PORT" once
# the listening socket is bound. $STATE_DIR/access.log gets one JSON object
# per request (see AccessLogMiddleware); tokens, codes and secrets are never
# written there (sensitive query values are replaced with "[FILTERED]").
#
# Test-only endpoints (unauthenticated, loopback only):
#   POST /__test__/age_tokens?seconds=N  move created_at of every access
#                                        token N seconds into the past
#   POST /__test__/reset                 delete all grants and tokens
#   GET  /__test__/tokens                summary of the token rows

$stdout.sync = true

PORT = Integer(ENV.fetch("PORT") { abort "doorkeeper_app.rb: PORT is required" })
STATE_DIR = File.expand_path(ENV.fetch("STATE_DIR") { abort "doorkeeper_app.rb: STATE_DIR is required" })
ACCESS_TOKEN_TTL = Integer(ENV.fetch("ACCESS_TOKEN_TTL", "7200"))
PREVIOUS_REFRESH_TOKEN = !%w[0 false no off].include?(ENV.fetch("PREVIOUS_REFRESH_TOKEN", "1").strip.downcase)
CLIENT_ID = ENV.fetch("CLIENT_ID", "memo-cli-test-client")
CLIENT_SECRET = ENV.fetch("CLIENT_SECRET", "memo-cli-test-secret")
OOB_URI = "urn:ietf:wg:oauth:2.0:oob"
REDIRECT_URIS = [OOB_URI, *ENV.fetch("REDIRECT_URIS", "").split(/\s+/).reject(&:empty?)].uniq
DEMO_EMAIL = ENV.fetch("DEMO_EMAIL", "demo@example.com")
DEMO_PASSWORD = ENV.fetch("DEMO_PASSWORD", "demo-password-123")
MEMO_MESSAGE = "ふじ"
APP_SCOPES = "read write openid offline_access"

def env_flag(name)
  %w[1 true yes on].include?(ENV.fetch(name, "").strip.downcase)
end

TLS_CERT = ENV.fetch("TLS_CERT", "")
TLS_KEY = ENV.fetch("TLS_KEY", "")
SCHEME = TLS_CERT.empty? ? "http" : "https"
ISSUER = "#{SCHEME}://127.0.0.1:#{PORT}"
GRANT_SCOPES = ENV.fetch("GRANT_SCOPES", "").split(/[\s,]+/).reject(&:empty?).then { |list| list.empty? ? nil : list }
STRICT_REFRESH_SCOPE = env_flag("STRICT_REFRESH_SCOPE")
REFUSE_ACCESS_TOKEN_REVOCATION = env_flag("REFUSE_ACCESS_TOKEN_REVOCATION")
ISS_VALUE = ENV.fetch("ISS_VALUE", "").strip.then { |value| value.empty? ? nil : value }
SEND_ISS = env_flag("SEND_ISS") || !ISS_VALUE.nil?
ADVERTISE_ISS = env_flag("ADVERTISE_ISS") || SEND_ISS
OIDC = env_flag("OIDC")
REQUIRE_RESOURCE = ENV.fetch("REQUIRE_RESOURCE", "").strip.then { |value| value.empty? ? nil : value }
PUBLIC_CLIENT_ID = ENV.fetch("PUBLIC_CLIENT_ID", "").strip.then { |value| value.empty? ? nil : value }

require "fileutils"
require "json"
require "logger"
require "securerandom"
require "ipaddr"
require "stringio"
require "uri"

FileUtils.mkdir_p(STATE_DIR)

# A stable secret across restarts keeps the browser's session cookie valid.
secret_file = File.join(STATE_DIR, "secret_key_base")
File.write(secret_file, SecureRandom.hex(64)) unless File.exist?(secret_file)
ENV["SECRET_KEY_BASE"] = File.read(secret_file).strip
ENV["RAILS_ENV"] = "production"
ENV["RACK_ENV"] = "production"
ENV["DATABASE_URL"] = "sqlite3:#{File.join(STATE_DIR, 'db.sqlite3')}?pool=10&timeout=5000"

require "rails"
require "active_record/railtie"
require "action_controller/railtie"
require "action_view/railtie"
DEVISE =
  if %w[1 true yes on].include?(ENV.fetch("NO_DEVISE", "").strip.downcase)
    false
  else
    begin
      require "devise"
      require "devise/orm/active_record"
      true
    rescue LoadError
      false
    end
  end
require "bcrypt"
require "doorkeeper"
if OIDC
  begin
    require "doorkeeper/openid_connect"
  rescue LoadError => e
    abort "doorkeeper_app.rb: OIDC=1 needs ruby-doorkeeper-openid-connect " \
          "(apt-get install ruby-doorkeeper-openid-connect): #{e.message}"
  end
  OIDC_KEY_FILE = File.join(STATE_DIR, "oidc_signing_key.pem")
  unless File.exist?(OIDC_KEY_FILE)
    File.open(OIDC_KEY_FILE, File::WRONLY | File::CREAT | File::EXCL, 0o600) do |file|
      file.write(OpenSSL::PKey::RSA.new(2048).to_pem)
    end
  end
end
require "webrick"
# Before the prepend below: webrick/https aliases meta_vars, which would otherwise call the prepended one forever.
require "webrick/https" unless TLS_CERT.empty?

# WEBrick's Rack env has no REMOTE_PORT; the access log needs it to count TCP
# connections (one client port per connection).
module RemotePortMetaVars
  def meta_vars
    meta = super
    meta["REMOTE_PORT"] = @peeraddr[1].to_s if @peeraddr
    meta
  end
end
WEBrick::HTTPRequest.prepend(RemotePortMetaVars)

# One JSON line per request with the keys of AccessEntry (tests/servers/harness.py), written before the
# response is handed back to the server (so a client that got its response finds the line in the file).
# Besides started/finished, method, path, status: the query with secret values filtered, the
# grant_type, the Authorization kind (auth: bearer/basic), at the client-
# authenticating endpoints the client authentication kind (client_auth:
# basic / post = client_secret in the body / none), the non-secret parameters
# of query and form body (params; a repeated one as a list), which secret
# parameters were present (secret_params: names only, never values), the form's field names (body_keys), and
# a redirect's Location with secret values filtered (so `iss` can be checked).
class AccessLogMiddleware
  SENSITIVE = %w[
    code access_token refresh_token token id_token client_secret code_verifier
    password bearer_token authenticity_token device_code user_code nonce
  ].freeze
  LOGGED_PARAMS = %w[
    scope resource prompt token_type_hint iss client_id response_type redirect_uri state
    code_challenge_method error grant_type
  ].freeze
  PRESENCE_PARAMS = %w[code_verifier client_secret code refresh_token token code_challenge].freeze
  CLIENT_AUTH_PATHS = %w[/oauth/token /oauth/revoke /oauth/introspect].freeze
  MAX_BODY = 1 << 16

  def initialize(app, path)
    @app = app
    @io = File.open(path, "a")
    @io.sync = true
    @mutex = Mutex.new
  end

  def call(env)
    started = Time.now.to_f
    # Warden's failure app and the router rewrite PATH_INFO: keep the originals.
    request = {
      method: env["REQUEST_METHOD"].to_s.dup,
      path: "#{env['SCRIPT_NAME']}#{env['PATH_INFO']}",
      query: env["QUERY_STRING"].to_s.dup,
      authorization: env["HTTP_AUTHORIZATION"].to_s.dup,
      form: read_form(env),
    }
    status = 500
    headers = {}
    begin
      status, headers, body = @app.call(env)
      [status, headers, body]
    ensure
      write_line(env, request, started, status, headers)
    end
  end

  private

  # The form body, read before Rails parses it (and put back for it).
  def read_form(env)
    return {} unless env["CONTENT_TYPE"].to_s.start_with?("application/x-www-form-urlencoded")

    input = env["rack.input"]
    return {} unless input

    raw = input.read(MAX_BODY).to_s
    rest = input.read.to_s
    env["rack.input"] = StringIO.new(raw + rest)
    Rack::Utils.parse_query(raw)
  rescue StandardError
    {}
  end

  def write_line(env, request, started, status, headers)
    method = request[:method]
    path = request[:path]
    query = safe_parse(request[:query])
    form = request[:form]
    params = query.merge(form)
    line = { # the keys of AccessEntry (tests/servers/harness.py)
      started: started,
      finished: Time.now.to_f,
      method: method,
      path: path,
      query: filter_query(request[:query]),
      status: status.to_i,
      remote_port: env["REMOTE_PORT"]&.to_i,
      grant_type: method == "POST" && path.chomp("/") == "/oauth/token" ? form["grant_type"]&.to_s : nil,
      auth: auth_kind(request[:authorization]),
      client_auth: client_auth(path, request[:authorization], params),
      params: params.slice(*LOGGED_PARAMS),
      secret_params: PRESENCE_PARAMS.select { |name| params.key?(name) },
      body_keys: form.keys.sort,
      location: filter_url(location_of(headers)),
    }
    @mutex.synchronize { @io.write("#{JSON.generate(line)}\n") }
  rescue StandardError => e
    warn "access log: #{e.class}: #{e.message}"
  end

  def safe_parse(query)
    Rack::Utils.parse_query(query.to_s)
  rescue StandardError
    {}
  end

  def client_auth(path, header, params)
    return nil unless CLIENT_AUTH_PATHS.include?(path.chomp("/"))
    return "basic" if header.to_s.match?(/\ABasic\s/i)
    return "post" if params.key?("client_secret")

    "none"
  end

  def location_of(headers)
    return nil unless headers.respond_to?(:[])

    headers["Location"] || headers["location"]
  end

  def filter_url(url)
    return nil if url.nil?

    base, query = url.to_s.split("?", 2)
    query.nil? ? base : "#{base}?#{filter_query(query)}"
  end

  def filter_query(query)
    query.split("&").map do |pair|
      key, value = pair.split("=", 2)
      name = Rack::Utils.unescape(key.to_s)
      if value && SENSITIVE.include?(name)
        "#{key}=[FILTERED]"
      else
        pair
      end
    end.join("&")
  end

  def auth_kind(header)
    case header.to_s
    when /\ABearer\s/i then "bearer"
    when /\ABasic\s/i then "basic"
    end
  end
end

# RFC 9207: adds iss to the authorization response. Doorkeeper builds that
# response as a redirect from /oauth/authorize (to the client's redirect URI,
# or for the out-of-band URI to its own /oauth/authorize/native?code=...), so
# every such redirect carrying code or error gets iss=ISS_VALUE.
class IssMiddleware
  def initialize(app, iss)
    @app = app
    @iss = iss
  end

  def call(env)
    status, headers, body = @app.call(env)
    path = "#{env['SCRIPT_NAME']}#{env['PATH_INFO']}".chomp("/")
    location = headers["Location"] || headers["location"]
    if path == "/oauth/authorize" && (300..399).cover?(status.to_i) && location
      uri = URI.parse(location)
      query = Rack::Utils.parse_query(uri.query)
      if query.key?("code") || query.key?("error")
        uri.query = [uri.query, Rack::Utils.build_query("iss" => @iss)].compact.join("&")
        headers[headers.key?("Location") ? "Location" : "location"] = uri.to_s
      end
    end
    [status, headers, body]
  end
end

# Views the gems don't ship: a layout that shows Devise's flash messages.
VIEWS_DIR = File.join(STATE_DIR, "views")
FileUtils.mkdir_p(File.join(VIEWS_DIR, "layouts"))
File.write(File.join(VIEWS_DIR, "layouts", "application.html.erb"), <<~ERB)
  <!DOCTYPE html>
  <html>
    <head>
      <meta charset="utf-8">
      <title>Memo server</title>
      <%= csrf_meta_tags %>
    </head>
    <body>
      <% flash.each do |kind, message| %>
        <p class="flash <%= kind %>" id="flash_<%= kind %>"><%= message %></p>
      <% end %>
      <%= yield %>
    </body>
  </html>
ERB

# What a real app puts in config/locales: the consent page names each scope.
LOCALE_FILE = File.join(STATE_DIR, "locales", "en.yml")
FileUtils.mkdir_p(File.dirname(LOCALE_FILE))
File.write(LOCALE_FILE, <<~YAML)
  en:
    doorkeeper:
      scopes:
        read: "Read your memos"
        write: "Change your memos"
        openid: "Know who you are"
        offline_access: "Keep access while you are away"
YAML

class DoorkeeperTestApp < Rails::Application
  if respond_to?(:load_defaults)
    config.load_defaults(Rails::VERSION::STRING.to_f)
  end
  config.root = STATE_DIR
  config.eager_load = false
  config.consider_all_requests_local = false
  config.logger = Logger.new(File.join(STATE_DIR, "rails.log"))
  config.log_level = ENV.fetch("RAILS_LOG_LEVEL", "warn").to_sym
  config.active_support.deprecation = :silence
  config.active_support.report_deprecations = false if Rails::VERSION::MAJOR >= 7
  config.hosts.clear if config.respond_to?(:hosts)
  rails_version = Gem::Version.new(Rails::VERSION::STRING)
  # Rails 7 refuses redirects to other hosts by default; Doorkeeper must
  # redirect to the client's loopback listener.
  config.action_controller.raise_on_open_redirects = false if rails_version >= Gem::Version.new("7.0")
  config.active_record.sqlite3_production_warning = false if rails_version >= Gem::Version.new("7.1")
  config.i18n.load_path << LOCALE_FILE
  config.session_store :cookie_store, key: "_memo_server_session"
  config.filter_parameters += %i[
    password token code secret refresh_token code_verifier client_secret access_token authenticity_token
  ]
  config.filter_redirect << /[?&#](code|access_token|refresh_token)=/ if config.respond_to?(:filter_redirect)
  config.middleware.insert_before 0, AccessLogMiddleware, File.join(STATE_DIR, "access.log")
  # One request at a time, like a single-threaded app server; keeps SQLite
  # free of lock contention.
  config.middleware.insert_after AccessLogMiddleware, Rack::Lock
  config.middleware.insert_after Rack::Lock, IssMiddleware, ISS_VALUE || ISSUER if SEND_ISS

  # What a real app keeps in config/initializers/*.rb and app/models.
  initializer "memo_server.setup", after: :load_config_initializers do |app|
    if DEVISE
      Devise.setup do |devise|
        devise.secret_key = app.secret_key_base
        devise.mailer_sender = "noreply@example.com"
        devise.stretches = BCRYPT_COST
        devise.sign_out_via = :delete
        devise.navigational_formats = ["*/*", :html] if devise.respond_to?(:navigational_formats=)
        devise.skip_session_storage = [:http_auth]
      end
    end

    Doorkeeper.configure do
      orm :active_record
      resource_owner_authenticator do
        if DEVISE
          current_user || warden.authenticate!(scope: :user)
        else
          authenticate_user!
        end
      end
      admin_authenticator do
        head :forbidden
      end
      access_token_expires_in ACCESS_TOKEN_TTL.seconds
      use_refresh_token
      default_scopes :read
      optional_scopes :write, :openid, :offline_access
      grant_flows %w[authorization_code]
      force_ssl_in_redirect_uri false
    end

    configure_openid_connect if OIDC
    define_models
  end

  initializer "memo_server.routes" do |app|
    app.routes.prepend do
      if DEVISE
        devise_for :users
      else
        get "users/sign_in", to: "user_sessions#new", as: :new_user_session
        post "users/sign_in", to: "user_sessions#create", as: :user_session
        delete "users/sign_out", to: "user_sessions#destroy", as: :destroy_user_session
      end
      use_doorkeeper
      use_doorkeeper_openid_connect if OIDC
      scope :api, module: :api do
        # Rails matches these with or without the trailing slash.
        get "memos", to: "memos#index"
        get "admin", to: "admin#index"
      end
      post "__test__/age_tokens", to: "test_admin#age_tokens"
      post "__test__/reset", to: "test_admin#reset"
      get "__test__/tokens", to: "test_admin#tokens"
      root to: "home#index"
    end
  end
end

# Devise's routes need User, and the routes are drawn during initialize!, so
# the model is defined from an initializer (named first, then configured).
def define_models
  Object.const_set(:User, Class.new(ActiveRecord::Base))
  if DEVISE
    User.class_eval do
      devise :database_authenticatable, :validatable
    end
  else
    User.include(BuiltinAuth::Model)
  end
end

# Devise's controllers inherit from it. Made once initialize! is done: a
# subclass of ActionController::Base includes every engine helper, and Rails 7
# cannot autoload those (Doorkeeper::DashboardHelper) from an initializer.
def define_application_controller
  Object.const_set(:ApplicationController, Class.new(ActionController::Base))
  ApplicationController.class_eval do
    prepend_view_path VIEWS_DIR
    layout "application"
  end
end

BCRYPT_COST = 4 # the bcrypt minimum: fast test logins

# What config/initializers/doorkeeper_openid_connect.rb holds in a real app.
def configure_openid_connect
  Doorkeeper::OpenidConnect.configure do
    issuer ISSUER
    signing_key File.read(OIDC_KEY_FILE)
    subject_types_supported [:public]
    resource_owner_from_access_token { |access_token| User.find_by(id: access_token.resource_owner_id) }
    auth_time_from_resource_owner { |_user| nil }
    reauthenticate_resource_owner do |_user, return_to|
      reset_session
      session[:user_return_to] = return_to
      redirect_to "/users/sign_in"
    end
    subject { |user, _application| user.id.to_s }
    # Production mode would otherwise advertise every endpoint as https, even over http.
    protocol { SCHEME.to_sym }
  end
end

# The switches that change Doorkeeper's own controllers (see the header).
module TestSwitches
  def self.resources(request)
    values = []
    [request.query_string, request.raw_post].each do |source|
      next if source.blank?

      value = Rack::Utils.parse_query(source)["resource"]
      values.concat(Array(value))
    end
    values
  rescue StandardError
    []
  end

  def self.json_error(controller, error, description = nil)
    body = { error: error }
    body[:error_description] = description if description
    controller.render json: body, status: :bad_request
  end

  module Authorizations
    private

    # RFC 6749 §3.3: the server may grant fewer scopes than asked.
    def pre_auth_params
      permitted = super
      if GRANT_SCOPES && permitted[:scope]
        permitted[:scope] = (permitted[:scope].to_s.split & GRANT_SCOPES).join(" ")
      end
      permitted
    end

    # RFC 8707 §2: a missing or unknown resource is invalid_target, reported
    # like any authorization error (a redirect to the client, or for the
    # out-of-band URI a JSON page as Doorkeeper shows for Deny).
    def require_resource_indicator
      return if TestSwitches.resources(request).include?(REQUIRE_RESOURCE)
      return unless pre_auth.authorizable? # Doorkeeper reports its own errors first

      description = "resource=#{REQUIRE_RESOURCE} is required"
      if Doorkeeper::OAuth::Helpers::URIChecker.oob_uri?(pre_auth.redirect_uri)
        TestSwitches.json_error(self, "invalid_target", description)
      else
        query = { error: "invalid_target", error_description: description, state: pre_auth.state }.compact
        redirect_to Doorkeeper::OAuth::Authorization::URIBuilder.uri_with_query(pre_auth.redirect_uri, query)
      end
    end
  end

  module Tokens
    def create
      grant_type = params[:grant_type].to_s
      if REQUIRE_RESOURCE && %w[authorization_code refresh_token].include?(grant_type) &&
         !TestSwitches.resources(request).include?(REQUIRE_RESOURCE)
        return TestSwitches.json_error(self, "invalid_target", "resource=#{REQUIRE_RESOURCE} is required")
      end
      return if STRICT_REFRESH_SCOPE && grant_type == "refresh_token" && refuse_wider_refresh_scope

      super
    end

    def revoke
      if REFUSE_ACCESS_TOKEN_REVOCATION && Doorkeeper.config.access_token_model.by_token(params["token"].to_s)
        return TestSwitches.json_error(self, "unsupported_token_type")
      end

      super
    end

    private

    # RFC 6749 §6: the scope of a refresh must not include any scope not
    # originally granted. Unknown or dead refresh tokens are left to Doorkeeper.
    def refuse_wider_refresh_scope
      asked = params[:scope].to_s.split
      return false if asked.empty?

      token = Doorkeeper.config.access_token_model.by_refresh_token(params[:refresh_token].to_s)
      return false if token.nil? || token.revoked?
      return false if (asked - token.scopes.to_a).empty?

      TestSwitches.json_error(self, "invalid_scope", "refresh token missing requested scope")
      true
    end
  end

  module Discovery
    private

    def provider_response
      response = super
      response[:authorization_response_iss_parameter_supported] = true if ADVERTISE_ISS
      response
    end
  end

  def self.install!
    Doorkeeper::AuthorizationsController.prepend(Authorizations)
    Doorkeeper::AuthorizationsController.before_action(:require_resource_indicator, only: :new) if REQUIRE_RESOURCE
    Doorkeeper::TokensController.prepend(Tokens)
    Doorkeeper::OpenidConnect::DiscoveryController.prepend(Discovery) if OIDC
  end
end

# The part of Devise (database_authenticatable, validatable, sessions) this app
# uses, for when Devise is not installed. Same routes, form field names, flash
# texts and password hashes (bcrypt in users.encrypted_password) as Devise.
module BuiltinAuth
  SIGN_IN_PATH = "/users/sign_in"

  module Model
    def self.included(base)
      base.attr_reader :password
      base.before_validation { self.email = email.to_s.strip.downcase }
      base.validates :email, presence: true, uniqueness: { case_sensitive: true },
                             format: { with: /\A[^@\s]+@[^@\s]+\z/ }
      base.validates :password, presence: true, confirmation: true, length: { within: 6..128 },
                                if: -> { new_record? || !password.nil? }
    end

    def password=(value)
      @password = value
      self.encrypted_password = value.nil? ? "" : BCrypt::Password.create(value, cost: BCRYPT_COST).to_s
    end

    def valid_password?(value)
      encrypted_password.present? && BCrypt::Password.new(encrypted_password).is_password?(value.to_s)
    rescue BCrypt::Errors::InvalidHash
      false
    end
  end

  # Mixed into ActionController::Base, like Devise's helpers.
  module Controller
    def self.included(base)
      base.helper_method :current_user, :user_signed_in? if base.respond_to?(:helper_method)
    end

    def current_user
      return @current_user if defined?(@current_user)

      @current_user = session[:user_id] ? User.find_by(id: session[:user_id]) : nil
    end

    def user_signed_in?
      !current_user.nil?
    end

    # Like warden.authenticate!: the user, or a redirect to the sign-in page (nil).
    def authenticate_user!
      return current_user if current_user

      session[:user_return_to] = request.fullpath if request.get?
      redirect_to SIGN_IN_PATH
      nil
    end
  end

  SIGN_IN_PAGE = <<~ERB
    <h2>Log in</h2>
    <%= form_with scope: :user, url: BuiltinAuth::SIGN_IN_PATH, local: true do |f| %>
      <div class="field"><%= f.label :email %><br><%= f.email_field :email, value: @email, autofocus: true, autocomplete: "email" %></div>
      <div class="field"><%= f.label :password %><br><%= f.password_field :password, autocomplete: "current-password" %></div>
      <div class="actions"><%= f.submit "Log in" %></div>
    <% end %>
  ERB
end

unless DEVISE
  ActiveSupport.on_load(:action_controller_base) { include BuiltinAuth::Controller }

  # Devise's SessionsController: sign-in form, sign in, sign out.
  class UserSessionsController < ActionController::Base
    prepend_view_path VIEWS_DIR
    layout "application"

    def new
      render inline: BuiltinAuth::SIGN_IN_PAGE, layout: "application"
    end

    def create
      credentials = params.fetch(:user, {})
      @email = credentials[:email].to_s.strip.downcase
      user = User.find_by(email: @email)
      if user&.valid_password?(credentials[:password].to_s)
        return_to = session[:user_return_to]
        reset_session # a new session id on sign-in, as Devise does
        session[:user_id] = user.id
        flash[:notice] = "Signed in successfully."
        redirect_to return_to.presence || "/"
      else
        flash.now[:alert] = "Invalid Email or password."
        render inline: BuiltinAuth::SIGN_IN_PAGE, layout: "application"
      end
    end

    def destroy
      reset_session
      flash[:notice] = "Signed out successfully."
      redirect_to "/", status: :see_other
    end
  end
end

API_BASE = defined?(ActionController::API) ? ActionController::API : ActionController::Base

class HomeController < ActionController::Base
  def index
    text = user_signed_in? ? "Signed in as #{current_user.email}" : "Not signed in"
    render html: "<!DOCTYPE html><html><body><p id=\"home\">#{ERB::Util.h(text)}</p></body></html>".html_safe
  end
end

module Api
  class MemosController < API_BASE
    before_action -> { doorkeeper_authorize! :read }

    def index
      render json: { message: MEMO_MESSAGE }
    end
  end

  class AdminController < API_BASE
    before_action -> { doorkeeper_authorize! :admin }

    def index
      render json: { admin: true }
    end
  end
end

class TestAdminController < API_BASE
  before_action :loopback_only

  def age_tokens
    seconds = Integer(params.fetch(:seconds))
    count = 0
    Doorkeeper::AccessToken.find_each do |token|
      token.update_columns(created_at: token.created_at - seconds)
      count += 1
    end
    render json: { aged: count, seconds: seconds }
  end

  def reset
    Doorkeeper::OpenidConnect::Request.delete_all if OIDC
    tokens = Doorkeeper::AccessToken.delete_all
    grants = Doorkeeper::AccessGrant.delete_all
    render json: { tokens_deleted: tokens, grants_deleted: grants }
  end

  def tokens
    has_previous = Doorkeeper::AccessToken.column_names.include?("previous_refresh_token")
    rows = Doorkeeper::AccessToken.order(:id).map do |token|
      {
        id: token.id,
        application_id: token.application_id,
        resource_owner_id: token.resource_owner_id,
        scopes: token.scopes.to_s,
        created_at: token.created_at.utc.iso8601(3),
        expires_in: token.expires_in,
        expired: token.expired?,
        revoked_at: token.revoked_at&.utc&.iso8601(3),
        revoked: token.revoked?,
        has_refresh_token: token.refresh_token.present?,
        has_previous_refresh_token: has_previous ? token.previous_refresh_token.present? : nil,
      }
    end
    render json: { previous_refresh_token_column: has_previous, tokens: rows }
  end

  private

  def loopback_only
    ip = IPAddr.new(request.remote_addr.to_s)
    head :forbidden unless ip.loopback?
  rescue IPAddr::InvalidAddressError
    head :forbidden
  end
end

Rails.application.initialize!
define_application_controller
TestSwitches.install!

# The tables Doorkeeper's install + PKCE generators make, and Devise's users.
def build_schema
  connection = ActiveRecord::Base.connection
  ActiveRecord::Schema.verbose = false
  ActiveRecord::Schema.define do
    unless connection.table_exists?(:users)
      create_table :users do |t|
        t.string :email, null: false, default: ""
        t.string :encrypted_password, null: false, default: ""
        t.timestamps null: false
      end
      add_index :users, :email, unique: true
    end

    unless connection.table_exists?(:oauth_applications)
      create_table :oauth_applications do |t|
        t.string :name, null: false
        t.string :uid, null: false
        t.string :secret, null: false
        t.text :redirect_uri, null: false
        t.string :scopes, null: false, default: ""
        t.boolean :confidential, null: false, default: true
        t.timestamps null: false
      end
      add_index :oauth_applications, :uid, unique: true
    end

    unless connection.table_exists?(:oauth_access_grants)
      create_table :oauth_access_grants do |t|
        t.references :resource_owner, null: false
        t.references :application, null: false, foreign_key: { to_table: :oauth_applications }
        t.string :token, null: false
        t.integer :expires_in, null: false
        t.text :redirect_uri, null: false
        t.datetime :created_at, null: false
        t.datetime :revoked_at
        t.string :scopes, null: false, default: ""
        t.string :code_challenge, null: true
        t.string :code_challenge_method, null: true
      end
      add_index :oauth_access_grants, :token, unique: true
    end

    unless connection.table_exists?(:oauth_access_tokens)
      create_table :oauth_access_tokens do |t|
        t.references :resource_owner, index: true
        t.references :application, null: false, foreign_key: { to_table: :oauth_applications }
        t.string :token, null: false
        t.string :refresh_token
        t.integer :expires_in
        t.datetime :revoked_at
        t.datetime :created_at, null: false
        t.string :scopes
      end
      add_index :oauth_access_tokens, :token, unique: true
      add_index :oauth_access_tokens, :refresh_token, unique: true
    end

    if OIDC && !connection.table_exists?(:oauth_openid_requests)
      create_table :oauth_openid_requests do |t|
        t.references :access_grant, null: false, index: true,
                                    foreign_key: { to_table: :oauth_access_grants, on_delete: :cascade }
        t.string :nonce, null: false
      end
    end

    has_previous = connection.column_exists?(:oauth_access_tokens, :previous_refresh_token)
    if PREVIOUS_REFRESH_TOKEN && !has_previous
      add_column :oauth_access_tokens, :previous_refresh_token, :string, null: false, default: ""
    elsif !PREVIOUS_REFRESH_TOKEN && has_previous
      remove_column :oauth_access_tokens, :previous_refresh_token
    end
  end
  [User, Doorkeeper::Application, Doorkeeper::AccessGrant, Doorkeeper::AccessToken].each(&:reset_column_information)
end

def seed
  user = User.find_or_initialize_by(email: DEMO_EMAIL)
  user.password = DEMO_PASSWORD
  user.save!

  app = Doorkeeper::Application.find_or_initialize_by(uid: CLIENT_ID)
  app.name = "Memo CLI"
  app.secret = CLIENT_SECRET
  app.redirect_uri = REDIRECT_URIS.join("\n")
  app.scopes = APP_SCOPES
  app.confidential = true
  app.save!

  return unless PUBLIC_CLIENT_ID

  public_app = Doorkeeper::Application.find_or_initialize_by(uid: PUBLIC_CLIENT_ID)
  public_app.name = "Memo CLI (public client)"
  public_app.redirect_uri = REDIRECT_URIS.join("\n")
  public_app.scopes = APP_SCOPES
  public_app.confidential = false
  public_app.save! # Doorkeeper stores a generated secret; a public client is never asked for it
end

build_schema
seed

if ENV["PARENT_PID"].to_s =~ /\A\d+\z/
  parent = Integer(ENV["PARENT_PID"])
  Thread.new do
    loop do
      sleep 1
      begin
        Process.kill(0, parent)
      rescue Errno::ESRCH
        Process.kill("TERM", Process.pid)
        break
      rescue Errno::EPERM
        nil
      end
    end
  end
end

handler =
  begin
    require "rackup/handler/webrick"
    Rackup::Handler::WEBrick
  rescue LoadError
    require "rack/handler/webrick"
    Rack::Handler::WEBrick
  end

tls_options = {}
unless TLS_CERT.empty?
  require "openssl"
  chain = File.read(TLS_CERT).scan(/-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----/m)
  tls_options = {
    SSLEnable: true,
    SSLCertificate: OpenSSL::X509::Certificate.new(chain.first),
    SSLExtraChainCert: chain.drop(1).map { |pem| OpenSSL::X509::Certificate.new(pem) },
    SSLPrivateKey: OpenSSL::PKey.read(File.read(TLS_KEY)),
    SSLCertName: nil,
  }
end

server_log = File.open(File.join(STATE_DIR, "webrick.log"), "a")
server_log.sync = true
handler.run(
  Rails.application,
  Host: "127.0.0.1",
  Port: PORT,
  Logger: WEBrick::Log.new(server_log, WEBrick::Log::WARN),
  AccessLog: [],
  StartCallback: -> { puts "READY #{ISSUER}" },
  **tls_options,
) do |server|
  %w[INT TERM].each { |signal| trap(signal) { server.shutdown } }
end
